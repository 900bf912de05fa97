"""Generators: every kind follows the contract in `synaug.generators.base` and is registered once in
`synaug.generators.registry`; `synaug generate` (`synaug.generators.generate`) samples any of them.

Nothing is imported here, so that loading one kind (or the contract) does not import every other kind's
dependencies (diffusers, peft).
"""
