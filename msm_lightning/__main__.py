"""`python -m msm_lightning` is the `msm` command."""

from msm_lightning.cli import main

main()
