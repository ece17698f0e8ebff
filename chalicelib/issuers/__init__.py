"""Issuers: make the device's certificate in the chosen region and say where its MQTT endpoint is."""
