"""`python -m trl_mig ...` is `trl-mig ...` (and what `accelerate launch -m trl_mig train ...` runs)."""

from .cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
