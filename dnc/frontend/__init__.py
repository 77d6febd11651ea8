"""The front end: a YAML spec file (or a git revision of one) read, bounded and validated into a `Spec`."""
