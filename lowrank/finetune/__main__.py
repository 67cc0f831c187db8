import sys

from lowrank.finetune.cli import main

sys.exit(main())
