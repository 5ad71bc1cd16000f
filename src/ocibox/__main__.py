from ocibox.cli import main

raise SystemExit(main())
