import sys

from mtnlg.cli import main

sys.exit(main())
