"""The mesh's services, one package each."""
