"""The lab: throwaway network namespaces that reproduce the wrong-source bug.

`ctfix.lab.topology` is a library: `ctfix lab` and the test suite's fixtures both
build their namespaces with it.
"""
