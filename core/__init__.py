"""Foundations every layer uses: flags and config files, name registries and plugins, processes and collectives."""
