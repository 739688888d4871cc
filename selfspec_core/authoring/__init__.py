"""Tools for plugin authors: check-plugin and the new-domain scaffold."""
