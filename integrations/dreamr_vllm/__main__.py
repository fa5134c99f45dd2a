"""``python -m dreamr_vllm``: serve a local model folder on a local vLLM (``dreamr_vllm.server.main``)."""

from dreamr_vllm.server import main

raise SystemExit(main())
