"""`python -m dreamix_ray.cli`: the `dreamix` command."""

import sys

from . import main

sys.exit(main())
