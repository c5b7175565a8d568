"""The application: the `trl-mig` commands (`main` dispatches them). The library it drives is `trl_mig` itself."""
