"""Launchers: the processes around a run, above the ServerApp and the ClientApp.

`corolla sim` (Ray simulation, `simulate`), the virtual-clock simulator (`virtual`),
a SuperLink kept in a home folder (`superlink`), `corolla server` (`deployment`),
`corolla client` (`node`, `supernode`) and the process helpers they share
(`processes`). Nothing below this layer imports it.
"""
