package deploy

import pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"

// OrdersGeneration is the generation whose orders ds carries: its own,
// or for a renewal (a desired state the controller re-issued only to push
// its expiry back) the generation it renews. What was refused or rolled
// back under the orders of that generation stays refused through its
// renewals; only a new order (a generation that is no renewal) retries
// it.
func OrdersGeneration(ds *pb.DesiredState) uint64 {
	if r := ds.GetRenewsGeneration(); r > 0 && r < ds.GetGeneration() {
		return r
	}
	return ds.GetGeneration()
}
