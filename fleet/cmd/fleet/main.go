// Command fleet is the Edgefleet operator CLI: it lists devices, pushes model
// bundles and assigns them, talking to the controller's HTTP API.
package main

import (
	"os"

	"github.com/edgefleet/edgefleet/fleet/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
