"""``python -m dreamr_stream.zoo.judge_layers``: the stage's command (``dreamr zoo judge-layers``)."""

from dreamr_stream.zoo.judge_layers.train import main

main()
