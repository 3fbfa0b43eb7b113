"""Sample apps the CLI tests load by import path (``tests.apps.basic:app``)."""
