"""``python -m pgtq``: the same as the ``pgtq`` command."""

from pgtq.cli import main

if __name__ == "__main__":
    main()
