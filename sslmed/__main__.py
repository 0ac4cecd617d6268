import sys

from sslmed.cli import main

sys.exit(main())
