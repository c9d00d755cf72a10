"""The Ray runtime: the store actor that owns a stream's bank (store.py), the synthesizer
and trainer actors (actors.py), the driver that runs the core round loop through them
(driver.py), and starting, joining and sizing a cluster (cluster.py)."""
