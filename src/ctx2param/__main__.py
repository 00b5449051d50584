"""``python -m ctx2param``: the same as the ``ctx2param`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
