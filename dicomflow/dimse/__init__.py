"""DIMSE adapter (PS3.7 / PS3.4): pynetdicom SCP and SCU, bridged onto the server's event loop."""
