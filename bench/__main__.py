import sys

from .ablate import main

sys.exit(main())
