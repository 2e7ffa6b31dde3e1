package sim

// MQTT control packet types the simulator watches for (MQTT 3.1.1, 2.2.1).
const (
	pktPublish = 3
	pktPuback  = 4
)

// framerCapture is how much of a packet's body a framer keeps: enough for
// the topic and packet id of every message the agents exchange, whose
// topics are ef/v1/dev/{id}/{kind} with ids of at most 128 bytes.
const framerCapture = 256

// framer splits one direction of an MQTT byte stream into packets without
// buffering them: it reads each fixed header, keeps the first bytes of the
// body and skips the rest, so it costs the same for a 40-byte PUBACK and
// a 200 KiB telemetry batch. The simulator uses it to count messages and to
// see when a device's state has been acknowledged by the broker.
//
// A framer is fed by one goroutine at a time (the connection's reader or
// writer); it is not safe for concurrent use.
type framer struct {
	state    int // 0: fixed header byte; 1: remaining length; 2: body
	typ      byte
	flags    byte
	length   int // remaining length being decoded, then the body's size
	shift    uint
	lenBytes int
	got      int // body bytes seen
	body     [framerCapture]byte
	broken   bool
	onPacket func(typ, flags byte, body []byte)
}

// feed consumes the next bytes of the stream.
func (f *framer) feed(p []byte) {
	for len(p) > 0 && !f.broken {
		switch f.state {
		case 0:
			f.typ, f.flags = p[0]>>4, p[0]&0x0f
			f.length, f.shift, f.lenBytes, f.got = 0, 0, 0, 0
			f.state = 1
			p = p[1:]
		case 1:
			b := p[0]
			p = p[1:]
			f.length |= int(b&0x7f) << f.shift
			f.shift += 7
			f.lenBytes++
			if b&0x80 != 0 {
				if f.lenBytes == 4 {
					// Not MQTT (a length over four bytes): stop
					// counting rather than misread what follows.
					f.broken = true
				}
				continue
			}
			f.state = 2
			if f.length == 0 {
				f.done()
			}
		case 2:
			n := min(len(p), f.length-f.got)
			if f.got < framerCapture {
				copy(f.body[f.got:], p[:min(n, framerCapture-f.got)])
			}
			f.got += n
			p = p[n:]
			if f.got == f.length {
				f.done()
			}
		}
	}
}

func (f *framer) done() {
	f.state = 0
	if f.onPacket != nil {
		f.onPacket(f.typ, f.flags, f.body[:min(f.length, framerCapture)])
	}
}

// publishInfo reads the topic and packet id of a PUBLISH body prefix; ok
// is false when the prefix is too short to hold them.
func publishInfo(flags byte, body []byte) (topic []byte, id uint16, ok bool) {
	if len(body) < 2 {
		return nil, 0, false
	}
	n := int(body[0])<<8 | int(body[1])
	if len(body) < 2+n {
		return nil, 0, false
	}
	topic = body[2 : 2+n]
	if qos := (flags >> 1) & 3; qos > 0 {
		if len(body) < 4+n {
			return nil, 0, false
		}
		id = uint16(body[2+n])<<8 | uint16(body[3+n])
	}
	return topic, id, true
}

// packetID reads the packet id that a PUBACK body holds.
func packetID(body []byte) (uint16, bool) {
	if len(body) < 2 {
		return 0, false
	}
	return uint16(body[0])<<8 | uint16(body[1]), true
}

// isKind reports whether an ef/v1/dev/{id}/{kind} topic is of kind,
// without allocating: the framer runs for every packet of every agent.
func isKind(topic []byte, kind string) bool {
	return len(topic) > len(kind) && topic[len(topic)-len(kind)-1] == '/' && string(topic[len(topic)-len(kind):]) == kind
}
