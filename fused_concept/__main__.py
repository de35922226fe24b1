"""`python -m fused_concept {train,eval,sweep}`: the command line of the paper's application
(`fused_concept.training.cli`)."""
import sys

from fused_concept.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
