import sys

from fastcore.train import main

sys.exit(main())
