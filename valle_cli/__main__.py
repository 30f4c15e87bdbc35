"""`python -m valle_cli ...` is `valle ...` (what `valle tui` uses to start training with this interpreter)."""

from valle_cli.cli.app import main

if __name__ == "__main__":
    main()
