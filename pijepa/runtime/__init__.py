"""The bottom layer: errors, atomic writes, logging, signals, memory readings and packaged
resources. Imports nothing from the rest of pijepa."""
