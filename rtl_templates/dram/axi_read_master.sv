// axi_read_master: reads contiguous byte regions over AXI4 and streams them out as bus words.
//
// A command (address, byte count, tag) is split into INCR bursts of at most MAX_BURST beats that never
// cross a 4 KB boundary, as AXI4 requires. Up to MAX_OUTSTANDING bursts are in flight. A burst is issued
// only when the downstream buffer has room for it (`space` free words, less the beats already in flight),
// so the R channel is never stalled by this master's consumer and the interconnect is never held.
// Read data leaves on m_axis with the command's tag in tuser and tlast on the command's last beat.
// `err` is sticky: bit 0 a SLVERR/DECERR response, bit 1 an rlast that does not match the burst length.
// Addresses and byte counts are multiples of the bus width (the DRAM image aligns every region).

`default_nettype none

module axi_read_master #(
    parameter int ADDR_W          = 32,
    parameter int DATA_W          = 512,
    parameter int ID_W            = 1,
    parameter int LEN_W           = 32,    // bits of a command's byte count
    parameter int TAG_W           = 1,
    parameter int MAX_BURST       = 16,    // beats per burst, a power of two <= 256
    parameter int MAX_OUTSTANDING = 4,     // bursts in flight, a power of two
    parameter int SPACE_W         = 16     // bits of the `space` input
) (
    input  wire logic               clk,
    input  wire logic               rst_n,
    // command
    input  wire logic               s_cmd_valid,
    output      logic               s_cmd_ready,
    input  wire logic [ADDR_W-1:0]  s_cmd_addr,
    input  wire logic [LEN_W-1:0]   s_cmd_bytes,
    input  wire logic [TAG_W-1:0]   s_cmd_tag,
    input  wire logic [SPACE_W-1:0] space,         // words the consumer of m_axis can still take
    // AXI4 read address channel
    output      logic [ID_W-1:0]    m_axi_arid,
    output      logic [ADDR_W-1:0]  m_axi_araddr,
    output      logic [7:0]         m_axi_arlen,
    output      logic [2:0]         m_axi_arsize,
    output      logic [1:0]         m_axi_arburst,
    output      logic [3:0]         m_axi_arcache,
    output      logic [2:0]         m_axi_arprot,
    output      logic               m_axi_arvalid,
    input  wire logic               m_axi_arready,
    // AXI4 read data channel
    input  wire logic [ID_W-1:0]    m_axi_rid,
    input  wire logic [DATA_W-1:0]  m_axi_rdata,
    input  wire logic [1:0]         m_axi_rresp,
    input  wire logic               m_axi_rlast,
    input  wire logic               m_axi_rvalid,
    output      logic               m_axi_rready,
    // read data out
    output      logic               m_axis_tvalid,
    input  wire logic               m_axis_tready,
    output      logic [DATA_W-1:0]  m_axis_tdata,
    output      logic [TAG_W-1:0]   m_axis_tuser,
    output      logic               m_axis_tlast,
    output      logic [1:0]         err
);
    localparam int DB     = DATA_W / 8;                  // bytes per beat
    localparam int SIZE   = $clog2(DB);                  // AxSIZE
    localparam int BLW    = $clog2(MAX_BURST + 1);       // bits of a burst's beat count
    localparam int OSW    = $clog2(MAX_OUTSTANDING + 1);
    localparam int BEATW  = LEN_W - SIZE;                // bits of a command's beat count
    localparam int FLW    = TAG_W + 1 + BLW;             // per burst: tag, last of its command, beats

    initial begin
        if (DATA_W < 8 || DATA_W > 1024 || (1 << $clog2(DATA_W)) != DATA_W)
            $fatal(1, "axi_read_master: DATA_W must be a power of two in 8..1024, got %0d", DATA_W);
        if (MAX_BURST < 1 || MAX_BURST > 256 || (1 << $clog2(MAX_BURST)) != MAX_BURST)
            $fatal(1, "axi_read_master: MAX_BURST must be a power of two in 1..256, got %0d", MAX_BURST);
        if (MAX_BURST * DB > 4096) $fatal(1, "axi_read_master: a %0d-beat burst of %0d bytes crosses 4 KB", MAX_BURST, DB);
        if (MAX_OUTSTANDING < 1 || (1 << $clog2(MAX_OUTSTANDING)) != MAX_OUTSTANDING)
            $fatal(1, "axi_read_master: MAX_OUTSTANDING must be a power of two >= 1, got %0d", MAX_OUTSTANDING);
        if (ADDR_W < 12) $fatal(1, "axi_read_master: ADDR_W must be >= 12 (4 KB pages), got %0d", ADDR_W);
        if (LEN_W <= SIZE) $fatal(1, "axi_read_master: LEN_W too small");
        if (SPACE_W < BLW) $fatal(1, "axi_read_master: SPACE_W cannot count one burst");
    end

    // ---- the command being split into bursts -------------------------------------------------------
    logic              active;
    logic [ADDR_W-1:0] addr;
    logic [BEATW-1:0]  beats_left;
    logic [TAG_W-1:0]  tag;

    // beats up to the next 4 KB boundary, at most MAX_BURST, at most what is left
    wire logic [31:0] to_page = 32'(4096 / DB) - 32'(addr[11:0] >> SIZE);
    logic [BLW-1:0] burst;
    always_comb begin
        burst = BLW'(MAX_BURST);
        if (to_page < 32'(MAX_BURST)) burst = BLW'(to_page);
        if (beats_left < BEATW'(burst)) burst = BLW'(beats_left);
    end

    // ---- flow control: bursts in flight and the beats they will deliver ------------------------------
    logic [SPACE_W:0] reserved;            // beats issued and not yet delivered downstream
    logic [OSW-1:0]   outstanding;
    logic             fl_ready;
    wire logic room  = (SPACE_W+1)'(space) >= reserved + (SPACE_W+1)'(burst);
    wire logic issue = active && (!m_axi_arvalid || m_axi_arready) && outstanding < OSW'(MAX_OUTSTANDING)
                       && room && fl_ready;
    wire logic r_fire = m_axi_rvalid && m_axi_rready;
    wire logic r_done = r_fire && m_axi_rlast;

    assign s_cmd_ready = !active;

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            active <= 1'b0; addr <= '0; beats_left <= '0; tag <= '0;
            m_axi_arvalid <= 1'b0; m_axi_araddr <= '0; m_axi_arlen <= '0;
            reserved <= '0; outstanding <= '0;
        end else begin
            if (s_cmd_valid && s_cmd_ready) begin
                active <= s_cmd_bytes >= LEN_W'(DB);
                addr <= s_cmd_addr;
                beats_left <= BEATW'(s_cmd_bytes >> SIZE);
                tag <= s_cmd_tag;
            end else if (issue) begin
                addr <= addr + (ADDR_W'(burst) << SIZE);
                beats_left <= beats_left - BEATW'(burst);
                if (beats_left == BEATW'(burst)) active <= 1'b0;
            end
            if (issue) begin
                m_axi_arvalid <= 1'b1; m_axi_araddr <= addr; m_axi_arlen <= 8'(burst - 1'b1);
            end else if (m_axi_arready) begin
                m_axi_arvalid <= 1'b0;
            end
            reserved <= reserved + (issue ? (SPACE_W+1)'(burst) : '0) - (r_fire ? (SPACE_W+1)'(1) : '0);
            outstanding <= outstanding + OSW'(issue) - OSW'(r_done);
        end

    assign m_axi_arid    = '0;   // one ID: data returns in order
    assign m_axi_arsize  = 3'(SIZE);
    assign m_axi_arburst = 2'b01;   // INCR
    assign m_axi_arcache = 4'b0011; // normal, non-cacheable, bufferable
    assign m_axi_arprot  = 3'b000;

    // ---- per burst, in issue order: its tag, whether it ends its command, its beat count ---------------
    logic [FLW-1:0] fl_head;
    logic [$clog2((MAX_OUTSTANDING < 2 ? 2 : MAX_OUTSTANDING) + 1)-1:0] unused_fl_count;
    logic           fl_valid;
    axis_fifo #(.W(FLW), .DEPTH(MAX_OUTSTANDING < 2 ? 2 : MAX_OUTSTANDING)) u_bursts (
        .clk, .rst_n,
        .s_valid(issue), .s_ready(fl_ready), .s_data({tag, beats_left == BEATW'(burst), burst}),
        .m_valid(fl_valid), .m_ready(r_done), .m_data(fl_head), .count(unused_fl_count)
    );
    wire logic [BLW-1:0] fl_beats = fl_head[BLW-1:0];
    wire logic           fl_last  = fl_head[BLW];

    logic [BLW-1:0] rbeat;                 // beat within the burst now returning
    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            rbeat <= '0; err <= '0;
        end else if (r_fire) begin
            rbeat <= m_axi_rlast ? '0 : rbeat + 1'b1;
            if (m_axi_rresp[1]) err[0] <= 1'b1;
            if (!fl_valid || m_axi_rlast != (rbeat == fl_beats - 1'b1)) err[1] <= 1'b1;
        end

    assign m_axis_tvalid = m_axi_rvalid;
    assign m_axi_rready  = m_axis_tready;
    assign m_axis_tdata  = m_axi_rdata;
    assign m_axis_tuser  = fl_head[FLW-1 -: TAG_W];
    assign m_axis_tlast  = m_axi_rlast && fl_last;

    wire logic unused = ^{m_axi_rid, m_axi_rresp[0]};
endmodule

`default_nettype wire
