"""Site side: the ClientApp that trains on a site's data without sending it anywhere."""
