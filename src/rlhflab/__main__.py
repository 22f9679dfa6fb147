"""`python -m rlhflab ...`: the CLI as a module, the form `accelerate launch -m` and `torchrun -m` start."""

from rlhflab.cli import main

raise SystemExit(main())
