"""Entry point: `python run_batch.py MANIFEST [options]` (see `--help`)."""
from batch.cli import main

if __name__ == "__main__":
    main()
