"""`python -m src.demo ckpt=PATH [ckpt_b=PATH] ...`: see src.demo.serve."""

import sys

from src.demo.serve import main
from src.errors import reported_errors

with reported_errors():  # a UserError (e.g. a checkpoint that cannot load): one `error: ...` line, exit status 1
    sys.exit(main())
