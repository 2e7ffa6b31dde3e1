// Package e2e holds the end-to-end tests: real fleet-controller and
// fleet-agent processes built from this tree, a real broker (the
// controller's embedded one, and Mosquitto), real model bundles built from
// source, driven through the public HTTP APIs only.
package e2e
