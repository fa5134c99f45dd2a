"""The application above the library: the ``dreamr`` command, its resident daemon, ``dreamr serve``.

Layers, each importing only those below it::

    cli                  the parser and the dispatch (``dreamr`` = ``cli.entry``)
    serve, bench, sapo,  the commands that compose the core with its adapters
    calibrate
    daemon.client        ``dreamr reason`` through the resident daemon
    daemon.server        the daemon itself (``python -m dreamr_app.daemon.server``), a WebSocket adapter
    reason               ``dreamr reason``'s request, output and comparison; the models in this process
    daemon.files         the daemon's files, identity, start and ``dreamr daemon status`` / ``stop``
    common               the request value, usage errors and exit codes, model flags, ``load_reasoner``

The core (``dreamr_stream``) and the integrations never import this package. Importing it
imports nothing: ``dreamr reason`` with a running daemon must start fast.
"""

__all__: list[str] = []
