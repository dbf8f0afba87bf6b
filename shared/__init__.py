"""What both the coordinator and a site need, and nothing that only one side uses: the site data
contract, DICOM decoding, the model registry, local training, the wire protocol, run configuration
and Flower process control. Imports nothing from client, server or simulations.
"""
