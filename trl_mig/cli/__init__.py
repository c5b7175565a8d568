"""The application: the `trl-mig` commands (`main` dispatches them). The library it drives is `trl_mig` itself."""

from ..trl_surface import check_members

check_members("application")  # the TRL helpers the commands import (the library's are checked with `trl_mig`)
