"""Shared test helpers: the float64 oracle (`contract`), inputs and checks (`checks`), the implementations
walked by several tests (`impls`), fuzz cases (`fuzz`) and tiny training jobs (`tiny`). Tests import
helpers, never each other."""
