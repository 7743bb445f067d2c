"""Thin click commands, one per MLproject entry point: parse parameters, call `rlvr`, exit."""
