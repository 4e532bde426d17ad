from mathtune.cli import main

raise SystemExit(main())
