"""`python -m dmi_service_manager` is `dsm`."""

from .cli import main

raise SystemExit(main())
