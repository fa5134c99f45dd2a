"""The resident daemon behind ``dreamr reason``: its files (``files``), its client (``client``) and
the daemon itself (``server``, run as ``python -m dreamr_app.daemon.server``)."""

__all__: list[str] = []
