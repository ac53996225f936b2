"""Support for other libraries' layers, written as clients of the public rule API."""
