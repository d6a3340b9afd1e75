"""What runs in the test process (the parent side): raw peers and recording backends for
the wire tests, network namespaces, callers in threads, the Fly traffic recorder, the
scaling core's slow reference model, and parent programs a test starts and kills."""
