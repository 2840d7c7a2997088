"""`python -m mae_fast.cli COMMAND ...` (e.g. under torchrun)."""
import sys

from mae_fast.cli import main

sys.exit(main())
