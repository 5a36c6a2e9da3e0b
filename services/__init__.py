"""tenantserve services: admission, scheduler, workers and the code they share."""
