"""Model applications of KlipNote Serve.

Each subpackage wraps one model and runs in its own runtime env. Modules at this level
(`contract`, `runtime`) import only the standard library, numpy and ray, because every env
(ingress, belle2, whisperx) imports them.
"""
