"""Converters: each turns a nested adapter (read through :mod:`mlora_export.adapter`) into one target format."""
