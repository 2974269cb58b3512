"""Thin adapters of jackpot.core to other training frameworks; import the submodule you need:
`jackpot.integrations.verl` (pip install "jackpot[verl]"; verl imports it itself through its plugin entry
point) and `jackpot.integrations.trl` (pip install "jackpot[trl]"). Nothing is imported from here."""
