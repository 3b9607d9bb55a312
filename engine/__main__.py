import os
import sys

from engine.cli import main

try:
    sys.exit(main())
except BrokenPipeError:  # `python -m engine list | head`: the reader left, nothing is wrong
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
