"""``python -m dreamr_app``: the ``dreamr`` command without its console script."""

from dreamr_app.cli import entry

if __name__ == "__main__":
    entry()
