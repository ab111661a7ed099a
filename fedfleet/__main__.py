from fedfleet.cli import main

raise SystemExit(main())
