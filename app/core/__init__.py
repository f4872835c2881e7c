"""The bottom layer: settings, errors, logging, thread priority and request records; imports
nothing else of the app."""
